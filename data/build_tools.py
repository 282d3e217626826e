"""Writes data/tools.jsonl: 160 small tool-call conversations of our own, OpenAI-style records.

Three functions (weather, currency exchange, train tickets) with Chinese prompts. Most records call one tool,
get its result and answer from it; some need no tool (the model must then answer in plain text); a few have a
plain round first. Deterministic (seeded); the patterns are regular enough that the tiny model learns which
function to call and with which arguments. Run: python data/build_tools.py
"""

import json
import random
from pathlib import Path

rng = random.Random(20261204)

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "查询城市今天的天气",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "城市名，例如：北京"}}, "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "convert_currency", "description": "按今天的汇率换算货币金额",
        "parameters": {"type": "object", "properties": {
            "amount": {"type": "number"}, "from": {"type": "string", "description": "货币代码，例如 USD"},
            "to": {"type": "string", "description": "货币代码，例如 CNY"}}, "required": ["amount", "from", "to"]}}},
    {"type": "function", "function": {
        "name": "book_train", "description": "预订火车票",
        "parameters": {"type": "object", "properties": {
            "from_city": {"type": "string"}, "to_city": {"type": "string"},
            "date": {"type": "string", "description": "日期，YYYY-MM-DD"}},
            "required": ["from_city", "to_city", "date"]}}},
]
CITIES = ["北京", "上海", "广州", "深圳", "杭州", "成都", "西安", "武汉", "南京", "重庆"]
SKIES = ["晴", "多云", "小雨", "阴", "大风"]
CURRENCIES = [("美元", "USD", 7.18), ("欧元", "EUR", 7.79), ("日元", "JPY", 0.048), ("英镑", "GBP", 9.05)]
CHAT = [("你好", "你好！我可以帮你查天气、换算货币或预订火车票。"), ("谢谢", "不客气！"),
        ("你能做什么？", "我可以查询天气、换算货币、预订火车票。"), ("讲个笑话", "为什么程序员喜欢黑色？因为他们讨厌 bug 的光。")]


def call(n: int, name: str, args: dict, result) -> list[dict]:
    return [{"role": "assistant", "content": None, "tool_calls": [{
                "id": f"call_{n}", "type": "function",
                "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}]},
            {"role": "tool", "tool_call_id": f"call_{n}", "content": json.dumps(result, ensure_ascii=False)}]


def weather() -> list[dict]:
    city = rng.choice(CITIES)
    temp, sky = rng.randint(-5, 30), rng.choice(SKIES)
    ask = rng.choice([f"{city}今天天气怎么样？", f"查一下{city}的天气", f"{city}现在冷吗？"])
    return ([{"role": "user", "content": ask}] + call(1, "get_weather", {"city": city}, {"temperature": temp, "sky": sky})
            + [{"role": "assistant", "content": f"{city}今天{sky}，气温 {temp} 度。"}])


def currency() -> list[dict]:
    name, code, rate = rng.choice(CURRENCIES)
    amount = rng.choice([10, 50, 100, 200, 500, 1000])
    ask = rng.choice([f"{amount}{name}等于多少人民币？", f"帮我把 {amount} {name}换成人民币"])
    value = round(amount * rate, 2)
    return ([{"role": "user", "content": ask}]
            + call(1, "convert_currency", {"amount": amount, "from": code, "to": "CNY"}, {"result": value})
            + [{"role": "assistant", "content": f"{amount} {code} 约等于 {value} 元人民币。"}])


def train() -> list[dict]:
    a, b = rng.sample(CITIES, 2)
    day = f"2026-12-{rng.randint(5, 28):02d}"
    ask = rng.choice([f"帮我订一张{day}从{a}到{b}的火车票", f"我想{day}坐火车从{a}去{b}"])
    ticket = f"G{rng.randint(100, 999)}"
    return ([{"role": "user", "content": ask}]
            + call(1, "book_train", {"from_city": a, "to_city": b, "date": day}, {"ok": True, "train": ticket})
            + [{"role": "assistant", "content": f"已为你预订{day} {a}到{b}的 {ticket} 次列车。"}])


def plain() -> list[dict]:
    q, a = rng.choice(CHAT)
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def main() -> None:
    records = []
    for i in range(160):
        kind = [weather, currency, train, weather, currency, train, plain][i % 7]
        messages = kind()
        if kind is not plain and rng.random() < 0.15:
            messages = plain() + messages  # a plain round first
        records.append({"tools": TOOLS, "messages": messages})
    out = Path(__file__).with_name("tools.jsonl")
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    print(f"wrote {out}: {len(records)} records")


if __name__ == "__main__":
    main()
