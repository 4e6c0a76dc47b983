"""Build the tiny preset's byte-level BPE tokenizer (src/chatvla/model/assets/tiny_tokenizer/).

The corpus is generated here from templates (robot instructions, ChatVLA-2 style reasoning about
arithmetic, OCR and spatial relations, plus plain English), so the build needs no download and is
reproducible: `python scripts/build_tiny_tokenizer.py --check` rebuilds in memory and fails if the
committed tokenizer differs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

from chatvla.model.tokenizer import TINY_TOKENIZER_DIR, save_tokenizer, train_byte_level_bpe

OBJECTS = ["red block", "blue cup", "green ball", "yellow duck", "toy car", "teddy bear", "banana", "apple",
           "sponge", "marker", "card", "plate", "bowl", "box", "bottle", "dinosaur", "rabbit", "tiger"]
RELATIONS = ["left of", "right of", "in front of", "behind", "on top of", "next to", "inside"]
VERBS = ["pick up", "put", "place", "move", "push", "grasp", "open", "close", "stack", "sort"]
PLAIN = (
    "The robot looks at the table and reads the whiteboard. It counts the cards and finds the answer. "
    "The arm moves slowly to the target, opens the gripper, grasps the object and lifts it. "
    "Then it places the object on the marked area and returns to the home position. "
    "Cameras on the wrist and in front of the robot show the scene from two views. "
    "If the instruction changes, the robot thinks again before it acts. "
    "Safety first: the arm holds its position when no fresh command arrives."
)


def corpus() -> list[str]:
    lines: list[str] = [PLAIN] * 20
    for a, b in itertools.product(range(0, 30), range(0, 30)):
        lines.append(f"The whiteboard shows {a}+{b}. {a}+{b}={a + b}, pick the card {a + b}. Next action:")
    for verb, obj, rel, other in itertools.product(VERBS, OBJECTS[:8], RELATIONS, OBJECTS[8:14]):
        lines.append(f"{verb.capitalize()} the {obj} {rel} the {other}.")
        lines.append(f"The {obj} is {rel} the {other}, so I {verb} the {obj}. Next action:")
    for n in range(100):
        lines.append(f"Card {n} is on the table. The number on the card is {n}.")
    return lines


def build():
    return train_byte_level_bpe(corpus())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--check", action="store_true", help="fail if the committed tokenizer differs")
    args = ap.parse_args()
    tok = build()
    if args.check:
        committed = json.loads((TINY_TOKENIZER_DIR / "tokenizer.json").read_text())
        fresh = json.loads(tok.to_str())
        if committed["model"] != fresh["model"] or committed["added_tokens"] != fresh["added_tokens"]:
            print("tiny tokenizer differs from a fresh build", file=sys.stderr)
            return 1
        print("tiny tokenizer matches a fresh build")
        return 0
    save_tokenizer(tok, TINY_TOKENIZER_DIR)
    print(f"wrote {TINY_TOKENIZER_DIR} (vocab {tok.get_vocab_size()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
