"""Random inputs shared by the tests."""
import random

FAMILIES = ("bt", "armorm", "qrm", "urm", "grm")
WORDS = ("the", "cat", "reward", "model", "scores", "answers", "quickly", "and", "you", "are", "helpful",
         "Hello", "please", "what", "is", "a", "good", "question", "ok", "sure", "list", "three", "ideas",
         "12", "3.5", "!", "?", "émoji 🙂", "naïve", "over", "under", "newline\nhere")


def random_text(rng: random.Random, lo: int = 1, hi: int = 30) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def random_conversation(rng: random.Random, max_turns: int = 3, hi: int = 30) -> list[dict]:
    msgs = []
    if rng.random() < 0.3:
        msgs.append({"role": "system", "content": random_text(rng, 1, 10)})
    for _ in range(rng.randint(1, max_turns)):
        msgs.append({"role": "user", "content": random_text(rng, 1, hi)})
        msgs.append({"role": "assistant", "content": random_text(rng, 1, hi)})
    return msgs
