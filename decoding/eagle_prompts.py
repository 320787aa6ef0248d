"""Chat prompts for training EAGLE heads, written here: templates x topics, so no data set is downloaded.

Six kinds of request (writing, coding, explanations, lists, JSON, short Q&A) with a few templates each,
filled from topic lists; `chat_prompts(n, seed)` draws n distinct conversations from the product.
"""
from __future__ import annotations

import itertools
import random

from engine.tokenizer import Message

SUBJECTS = [
    "the ocean", "autumn leaves", "a lighthouse", "city traffic", "a lost cat", "the moon", "coffee", "a rainy day",
    "friendship", "mountains", "a robot learning to paint", "an old library", "the first day of school", "winter",
    "a busy kitchen", "the desert at night", "a train journey", "a small bakery", "space travel", "a garden in spring",
    "a thunderstorm", "an abandoned castle", "a video game", "a marathon", "the internet", "a birthday party",
]
CONCEPTS = [
    "photosynthesis", "inflation", "machine learning", "black holes", "the water cycle", "compound interest",
    "blockchain", "vaccines", "climate change", "gravity", "DNA", "supply and demand", "the immune system",
    "neural networks", "plate tectonics", "recursion", "encryption", "the stock market", "renewable energy",
    "evolution", "electricity", "the greenhouse effect", "quantum computing", "democracy", "cloud computing",
    "a hash table", "the French Revolution", "antibiotics", "a binary search", "the speed of light",
]
CODE_TASKS = [
    "reverses a string", "checks whether a number is prime", "computes the factorial of n",
    "returns the n-th Fibonacci number", "counts the vowels in a string", "finds the largest element of a list",
    "removes duplicates from a list", "checks whether a string is a palindrome", "sorts a list of dictionaries by a key",
    "merges two sorted lists", "reads a text file and counts its words", "converts Celsius to Fahrenheit",
    "flattens a nested list", "computes the average of a list of numbers", "validates an email address",
    "finds the greatest common divisor of two numbers", "returns the squares of the even numbers in a list",
    "capitalizes the first letter of every word", "implements binary search", "parses a CSV line into fields",
]
LANGUAGES = ["Python", "JavaScript", "Java", "C", "Rust", "Go", "SQL", "Bash"]
GOALS = [
    "sleeping better", "learning a new language", "saving money", "staying productive at home", "eating healthier",
    "starting to run", "writing a resume", "preparing for a job interview", "reducing stress", "studying for exams",
    "keeping a plant alive", "public speaking", "learning to code", "travelling on a budget", "making new friends",
    "organizing a small event", "reading more books", "taking better photos", "cooking for a family",
]
ENTITIES = [
    ("a book", "title, author, year, genres"), ("a person", "name, age, email, hobbies"),
    ("a city", "name, country, population, landmarks"), ("a movie", "title, director, year, rating"),
    ("a product", "name, price, in_stock, tags"), ("a recipe", "name, servings, ingredients, steps"),
    ("a car", "make, model, year, color"), ("a planet", "name, diameter_km, moons, has_rings"),
    ("a song", "title, artist, album, duration_seconds"), ("an employee", "id, name, department, salary"),
    ("a restaurant", "name, cuisine, rating, open_hours"), ("a course", "code, title, credits, instructor"),
]
COUNTRIES = [
    "France", "Japan", "Brazil", "Canada", "Egypt", "India", "Australia", "Germany", "Mexico", "Kenya", "Italy",
    "Spain", "Norway", "Argentina", "South Korea", "Turkey", "Peru", "Vietnam", "Poland", "Greece",
]
FACT_QUESTIONS = [
    "How many days are there in a leap year?", "What is the boiling point of water in Celsius?",
    "Who wrote Romeo and Juliet?", "What is the largest planet in the solar system?", "How many legs does a spider have?",
    "What gas do plants absorb from the air?", "What is the square root of 144?", "Who painted the Mona Lisa?",
    "What is the chemical symbol for gold?", "How many continents are there?", "What is the fastest land animal?",
    "What is 15 multiplied by 12?", "Which ocean is the largest?", "What language has the most native speakers?",
    "How many minutes are in a day?", "What is the freezing point of water in Fahrenheit?",
    "What is the longest river in the world?", "How many sides does a hexagon have?", "Who discovered penicillin?",
    "What is the smallest prime number?",
]
SENTENCES = [
    "the meeting was moved to next week because the manager is sick",
    "our new app lets users track their daily water intake and sends reminders",
    "the team finished the project early and under budget",
    "i think we should buy a bigger printer for the office",
    "the weather was terrible so the concert got cancelled",
    "customers are complaining that the website is slow on phones",
    "she learned to play the guitar in just three months",
    "the city plans to build a new park near the river",
]
PHRASES = ["Good morning, how are you?", "Where is the train station?", "Thank you for your help.",
           "I would like a cup of coffee.", "The weather is nice today.", "What time is it?"]
TRANSLATE_TO = ["French", "Spanish", "German", "Italian"]
SYSTEMS = [None, None, None, "You are a concise assistant.", "You are a friendly teacher.",
           "You are an expert software engineer."]

TEMPLATES: dict[str, list[tuple[str, dict[str, list]]]] = {
    "writing": [
        ("Write a short poem about {s}.", {"s": SUBJECTS}),
        ("Write a haiku about {s}.", {"s": SUBJECTS}),
        ("Write a short story about {s} in three paragraphs.", {"s": SUBJECTS}),
        ("Write a product description for a new gadget inspired by {s}.", {"s": SUBJECTS}),
        ("Write an email to my team about {g}.", {"g": GOALS}),
        ("Write a blog post introduction about {c}.", {"c": CONCEPTS}),
        ("Rewrite this sentence to sound more formal: {x}", {"x": SENTENCES}),
        ("Summarize in one sentence: {x}", {"x": SENTENCES}),
    ],
    "coding": [
        ("Write a {l} function that {t}.", {"l": LANGUAGES[:6], "t": CODE_TASKS}),
        ("How do I write code that {t} in {l}? Show an example.", {"t": CODE_TASKS, "l": LANGUAGES[:4]}),
        ("Write a Python function that {t}, with a docstring and two examples.", {"t": CODE_TASKS}),
        ("Explain how to implement a function that {t}.", {"t": CODE_TASKS}),
        ("What is the difference between a list and a tuple in {l}?", {"l": ["Python"]}),
        ("Write a SQL query that finds the top 5 {e} by {k}.",
         {"e": ["customers", "products", "employees", "orders"], "k": ["revenue", "price", "salary", "date"]}),
    ],
    "explain": [
        ("Explain {c} in simple terms.", {"c": CONCEPTS}),
        ("What is {c}?", {"c": CONCEPTS}),
        ("Explain {c} to a 10-year-old.", {"c": CONCEPTS}),
        ("Why is {c} important?", {"c": CONCEPTS}),
        ("What are the pros and cons of {c}?", {"c": CONCEPTS}),
        ("Compare {c} and {d} in a few sentences.", {"c": CONCEPTS[:10], "d": CONCEPTS[10:20]}),
    ],
    "lists": [
        ("List 5 tips for {g}.", {"g": GOALS}),
        ("Give me 3 ideas for {g}.", {"g": GOALS}),
        ("What are the benefits of {g}?", {"g": GOALS}),
        ("List 10 facts about {c}.", {"c": CONCEPTS}),
        ("Give me a step-by-step plan for {g}.", {"g": GOALS}),
        ("List the main tourist attractions in {n}.", {"n": COUNTRIES}),
    ],
    "json": [
        ("Return a JSON object describing {e} with the keys {k}. Output only JSON.", {"ek": ENTITIES}),
        ("Create a JSON array of 3 example records for {e}, each with {k}.", {"ek": ENTITIES}),
        ("Give me {e} as JSON with fields {k}.", {"ek": ENTITIES}),
        ("Extract the main facts from this text as JSON: {x}", {"x": SENTENCES}),
    ],
    "qa": [
        ("{q}", {"q": FACT_QUESTIONS}),
        ("{q} Answer in one sentence.", {"q": FACT_QUESTIONS}),
        ("What is the capital of {n}?", {"n": COUNTRIES}),
        ("What language is spoken in {n}?", {"n": COUNTRIES}),
        ("What is {n} famous for?", {"n": COUNTRIES}),
        ("Translate '{p}' into {t}.", {"p": PHRASES, "t": TRANSLATE_TO}),
    ],
}


def _fill(template: str, slots: dict[str, list]) -> list[str]:
    keys = list(slots)
    out = []
    for values in itertools.product(*(slots[k] for k in keys)):
        fields: dict[str, str] = {}
        for key, value in zip(keys, values):
            if key == "ek":  # an (entity, keys) pair fills two fields
                fields["e"], fields["k"] = value
            else:
                fields[key] = value
        out.append(template.format(**fields))
    return out


def all_prompts() -> dict[str, list[str]]:
    """Every prompt text, by kind (970 in all), in a fixed order."""
    return {kind: [p for template, slots in templates for p in _fill(template, slots)]
            for kind, templates in TEMPLATES.items()}


def chat_prompts(n: int, seed: int = 0) -> list[list[Message]]:
    """n distinct conversations, the kinds interleaved evenly, some with a system prompt."""
    rng = random.Random(seed)
    pools = []
    for texts in all_prompts().values():
        texts = list(texts)
        rng.shuffle(texts)
        pools.append(texts)
    order = [t for group in itertools.zip_longest(*pools) for t in group if t is not None]
    conversations = []
    for text in order[:n]:
        system = rng.choice(SYSTEMS)
        conv: list[Message] = [{"role": "system", "content": system}] if system else []
        conversations.append(conv + [{"role": "user", "content": text}])
    return conversations
