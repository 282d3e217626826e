"""Writes data/sample.json: ~200 small instruction records of our own, in the seed's format.

Deterministic (seeded), varied on purpose: Chinese and English, an `input` field, multi-turn `history`,
code, lists. The patterns are regular enough that the tiny demo model visibly learns them in minutes.
Run: python data/build_sample.py
"""

import json
import random
from pathlib import Path

rng = random.Random(20261128)

ZH_NUM = "零一二三四五六七八九十"
FRUITS = [("苹果", "apple"), ("香蕉", "banana"), ("橙子", "orange"), ("葡萄", "grape"), ("西瓜", "watermelon"),
          ("草莓", "strawberry"), ("桃子", "peach"), ("梨", "pear")]
COLORS = [("红色", "red"), ("蓝色", "blue"), ("绿色", "green"), ("黄色", "yellow"), ("黑色", "black"),
          ("白色", "white"), ("紫色", "purple")]
CAPITALS = [("中国", "China", "北京", "Beijing"), ("日本", "Japan", "东京", "Tokyo"),
            ("法国", "France", "巴黎", "Paris"), ("英国", "the United Kingdom", "伦敦", "London"),
            ("德国", "Germany", "柏林", "Berlin"), ("意大利", "Italy", "罗马", "Rome"),
            ("俄罗斯", "Russia", "莫斯科", "Moscow"), ("埃及", "Egypt", "开罗", "Cairo"),
            ("加拿大", "Canada", "渥太华", "Ottawa"), ("韩国", "South Korea", "首尔", "Seoul")]
OPS = [("加", "plus", "+", lambda a, b: a + b), ("减", "minus", "-", lambda a, b: a - b),
       ("乘", "times", "*", lambda a, b: a * b)]
SENTENCES = [("我喜欢猫。", "I like cats."), ("今天天气很好。", "The weather is nice today."),
             ("他在看书。", "He is reading a book."), ("我们明天去公园。", "We are going to the park tomorrow."),
             ("这杯茶很热。", "This cup of tea is hot."), ("她会说三种语言。", "She speaks three languages."),
             ("请把门关上。", "Please close the door."), ("火车八点出发。", "The train leaves at eight.")]
GREETINGS = [("你好", "你好！有什么可以帮你的吗？"), ("Hello", "Hello! How can I help you?"),
             ("早上好", "早上好！今天想聊点什么？"), ("Hi there", "Hi! What would you like to talk about?")]


def arithmetic():
    a, b = rng.randint(2, 30), rng.randint(2, 12)
    zh, en, sym, f = rng.choice(OPS)
    if rng.random() < 0.5:
        return {"instruction": f"计算 {a} {zh} {b} 等于多少？", "input": "", "output": f"{a} {zh} {b} 等于 {f(a, b)}。"}
    return {"instruction": f"What is {a} {en} {b}?", "input": "", "output": f"{a} {sym} {b} = {f(a, b)}."}


def capital():
    zh, en, czh, cen = rng.choice(CAPITALS)
    if rng.random() < 0.5:
        return {"instruction": f"{zh}的首都是哪里？", "input": "", "output": f"{zh}的首都是{czh}。"}
    return {"instruction": f"What is the capital of {en}?", "input": "", "output": f"The capital of {en} is {cen}."}


def translate():
    zh, en = rng.choice(SENTENCES)
    if rng.random() < 0.5:
        return {"instruction": "把下面的句子翻译成英文。", "input": zh, "output": en}
    return {"instruction": "Translate the sentence into Chinese.", "input": en, "output": zh}


def word():
    zh, en = rng.choice(FRUITS + COLORS)
    if rng.random() < 0.5:
        return {"instruction": f"“{zh}”用英文怎么说？", "input": "", "output": f"“{zh}”的英文是 {en}。"}
    return {"instruction": f"How do you say \"{en}\" in Chinese?", "input": "", "output": f"\"{en}\" is “{zh}” in Chinese."}


def listing():
    n = rng.randint(2, 4)
    kind, items = rng.choice([("水果", [z for z, _ in FRUITS]), ("颜色", [z for z, _ in COLORS]),
                              ("fruits", [e for _, e in FRUITS]), ("colors", [e for _, e in COLORS])])
    picked = rng.sample(items, n)
    body = "\n".join(f"{i}. {x}" for i, x in enumerate(picked, 1))
    if kind.isascii():
        return {"instruction": f"List {n} {kind}.", "input": "", "output": body}
    return {"instruction": f"列出{ZH_NUM[n]}种{kind}。", "input": "", "output": body}


def code():
    name, op, zh, en = rng.choice([("add", "+", "和", "sum"), ("sub", "-", "差", "difference"),
                                   ("mul", "*", "积", "product")])
    fn = f"def {name}(a, b):\n    return a {op} b"
    if rng.random() < 0.5:
        return {"instruction": f"写一个 Python 函数，返回两个数的{zh}。", "input": "",
                "output": f"```python\n{fn}\n```\n函数 `{name}` 返回 a 和 b 的{zh}。"}
    return {"instruction": f"Write a Python function that returns the {en} of two numbers.", "input": "",
            "output": f"```python\n{fn}\n```\n`{name}` returns the {en} of a and b."}


def text_op():
    w = rng.choice(["hello", "glmops", "ray", "python", "model", "token", "river", "garden"])
    if rng.random() < 0.5:
        return {"instruction": "Reverse the word.", "input": w, "output": w[::-1]}
    return {"instruction": "把这个单词改成大写。", "input": w, "output": w.upper()}


def multi_turn():
    g = rng.choice(GREETINGS)
    base = rng.choice([arithmetic, capital, word, translate])()
    history = [list(g)]
    if rng.random() < 0.4:
        prev = rng.choice([capital, word])()
        history.append([prev["instruction"], prev["output"]])
    return {**base, "history": history}


def main() -> None:
    makers = [arithmetic] * 4 + [capital] * 3 + [translate] * 3 + [word] * 3 + [listing] * 2 + [code] * 2 + \
             [text_op] * 2 + [multi_turn] * 4
    records, seen = [], set()
    while len(records) < 200:
        rec = rng.choice(makers)()
        key = json.dumps(rec, ensure_ascii=False, sort_keys=True)
        if key not in seen:
            seen.add(key)
            records.append(rec)
    out = Path(__file__).with_name("sample.json")
    out.write_text(json.dumps(records, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {len(records)} records to {out}")


if __name__ == "__main__":
    main()
