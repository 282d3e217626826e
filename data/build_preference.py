"""Writes data/preference.json: ~240 preference pairs of our own (`--stage dpo`), from the prompts of
data/sample.json's generators.

The chosen answer is the sample's complete answer. The rejected one is systematically worse, so a short run
can learn the difference: a refusal ("我不知道。"), or the chosen answer cut off after a few characters.
One record in five is in the OpenAI-messages form (`messages`, then `chosen` / `rejected` as assistant
messages); the rest in the seed's form with two answers. Deterministic.
Run: python data/build_preference.py
"""

import json
import random
from pathlib import Path

import build_sample as sample

rng = random.Random(20261205)
sample.rng = random.Random(20261206)  # the prompt generators draw from their module's rng

REFUSALS = ["我不知道。", "不清楚。", "这个问题我无法回答。", "自己查吧。", "I don't know.", "No idea."]


def rejected_for(chosen: str) -> str:
    if rng.random() < 0.6 or len(chosen) < 6:
        return rng.choice(REFUSALS)
    return chosen[:rng.randint(2, max(2, len(chosen) // 3))] + "……"


def as_messages(rec: dict) -> dict:
    messages = []
    for q, a in rec.get("history") or []:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    query = rec["instruction"] + (f"\n{rec['input']}" if rec.get("input") else "")
    messages.append({"role": "user", "content": query})
    return {"messages": messages, "chosen": {"role": "assistant", "content": rec["chosen"]},
            "rejected": {"role": "assistant", "content": rec["rejected"]}}


def main() -> None:
    makers = [sample.arithmetic] * 4 + [sample.capital] * 3 + [sample.translate] * 3 + [sample.word] * 3 + \
             [sample.listing] * 2 + [sample.code] * 2 + [sample.text_op] * 2 + [sample.multi_turn] * 3
    records, seen = [], set()
    while len(records) < 240:
        rec = rng.choice(makers)()
        key = json.dumps(rec, ensure_ascii=False, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        chosen = rec.pop("output")
        pair = {**{k: v for k, v in rec.items() if v}, "chosen": chosen, "rejected": rejected_for(chosen)}
        records.append(as_messages(pair) if rng.random() < 0.2 else pair)
    out = Path(__file__).with_name("preference.json")
    out.write_text(json.dumps(records, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {len(records)} records to {out}")


if __name__ == "__main__":
    main()
